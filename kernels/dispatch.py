"""Backend choice for the TTT Lens kernels (DESIGN §9).

The environment variable TTT_LENS_KERNELS is read at every call:
* "auto" (default, also when unset or empty): Triton when the tensors are on CUDA and Triton
  imports, the PyTorch reference otherwise (CPU tensors always use the reference: the Triton
  interpreter is a correctness tool, hundreds of times slower than torch).
* "triton": always the Triton kernels. On CPU tensors they run under the Triton interpreter,
  which only works if TRITON_INTERPRET=1 was set before the kernel module was imported
  (before its @triton.jit decorators ran); otherwise a RuntimeError says so.
* "torch": always the PyTorch reference.

Triton is imported lazily, so `import kernels` works without it (auto → torch, triton → error).
Triton kernels take fp32/fp16/bf16: a forced Triton call on float64 tensors (the exact tests'
models) runs them on fp32 copies and returns the result in float64 — forcing either backend works
for every caller, at the kernels' own precision.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from . import reference as _reference

ENV_VAR = "TTT_LENS_KERNELS"
CHOICES = ("auto", "triton", "torch")
_TRUE = ("1", "true", "on", "yes")
_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)

_triton_ok: bool | None = None
_triton_error: str = ""


def requested_backend() -> str:
    """The validated value of TTT_LENS_KERNELS ("auto" when unset or empty)."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={raw!r} is not valid; use one of {', '.join(CHOICES)}")
    return value


def triton_available() -> bool:
    """True when `import triton` succeeds (checked once per process)."""
    global _triton_ok, _triton_error
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            _triton_ok = True
        except Exception as exc:  # ImportError, or a broken install
            _triton_ok, _triton_error = False, f"{type(exc).__name__}: {exc}"
    return _triton_ok


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def current_backend() -> str:
    """"triton" or "torch": what the dispatcher would use now for tensors on this machine's
    default device (CUDA when available)."""
    req = requested_backend()
    if req != "auto":
        return req
    return "triton" if torch.cuda.is_available() and triton_available() else "torch"


def backend_label() -> str:
    """Human-readable badge for the UI."""
    backend = current_backend()
    gpu = torch.cuda.is_available()
    if backend == "triton":
        return "Triton on GPU" if gpu else "Triton (interpreter, CPU)"
    return "PyTorch reference on GPU" if gpu else "PyTorch reference on CPU"


def _choose(tensors: tuple[torch.Tensor, ...]) -> str:
    req = requested_backend()
    if req != "auto":
        return req
    on_cuda = all(t.is_cuda for t in tensors)
    supported = all(t.dtype in _HALF_OR_SINGLE for t in tensors)
    return "triton" if on_cuda and supported and triton_available() else "torch"


def _triton_module(name: str, on_cuda: bool) -> ModuleType:
    """Import kernels.<name> for a forced or automatic Triton call, with clear errors."""
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR} selects Triton but triton cannot be imported ({_triton_error}); "
                           f"install triton or set {ENV_VAR}=torch")
    full = f"{__package__}.{name}"
    mod = sys.modules.get(full)
    if not on_cuda:
        if mod is not None and not mod.INTERPRETED:
            raise RuntimeError(
                f"Triton on CPU tensors needs the interpreter, but {full} was imported without "
                "TRITON_INTERPRET=1 (its @triton.jit kernels are compiled for a GPU driver). Set "
                "TRITON_INTERPRET=1 before the first import of the kernels' Triton modules (e.g. in "
                f"conftest.py), or set {ENV_VAR}=torch/auto to use the PyTorch reference.")
        if mod is None and not _interpret_env():
            raise RuntimeError(
                f"{ENV_VAR}=triton on CPU tensors needs the Triton interpreter: set the environment "
                "variable TRITON_INTERPRET=1 before the Triton kernel modules are imported (it is read "
                "when @triton.jit decorates them), or use a CUDA device, or set "
                f"{ENV_VAR}=torch/auto for the PyTorch reference.")
    return importlib.import_module(full)


def _fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float64 → float32 copies for the Triton kernels (other dtypes pass through)."""
    return tuple(t.float() if t.dtype == torch.float64 else t for t in tensors)


def attention_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of new query rows q (B, Hq, M, D) at absolute positions q_offset … q_offset+M−1
    against a frozen cache k, v (B, Hkv, N, D), Hq a multiple of Hkv; row i sees keys
    j ≤ q_offset + i. Returns (o in q.dtype, lse fp32 (B, Hq, M))."""
    if _choose((q, k, v)) == "triton":
        mod = _triton_module("triton_attention", q.is_cuda)
        o, lse = mod.attention_with_cache(*_fp32(q, k, v), q_offset, scale)
        return o.to(q.dtype), lse
    return _reference.attention_with_cache(q, k, v, q_offset, scale)


def attention_with_cache_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, do: torch.Tensor, q_offset: int,
                            scale: float | None = None) -> torch.Tensor:
    """dQ of `attention_with_cache` given its (o, lse) and the upstream gradient do; no dK/dV."""
    if _choose((q, k, v, do)) == "triton":
        mod = _triton_module("triton_attention", q.is_cuda)
        return mod.attention_with_cache_dq(*_fp32(q, k, v, o), lse, *_fp32(do), q_offset, scale).to(q.dtype)
    return _reference.attention_with_cache_dq(q, k, v, o, lse, do, q_offset, scale)


# Largest attention-probability tensor (bytes, per call, i.e. per layer) the torch backend keeps for the
# backward: at most ~0.5 GB over a 30-layer model (a 128-row span sees up to 3,640 keys within it).
SAVED_PROBS_BUDGET = 16 << 20


def saves_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> bool:
    """True when `frozen_kv_attention` should run the torch backend's keep-P path
    (`reference.attention_with_cache_probs` + `attention_dq_from_probs`): the backend is torch
    and P (B·Hq·M·N_vis floats, N_vis = min(N, q_offset + M)) fits SAVED_PROBS_BUDGET. The
    backward then costs two matmuls instead of recomputing q kᵀ, the mask and the exponentials.
    Triton always recomputes (FlashAttention-2 style) from (o, lse)."""
    if _choose((q, k, v)) != "torch":
        return False
    B, Hq, M, _ = q.shape
    n_vis = min(k.shape[2], int(q_offset) + M)
    item = 8 if q.dtype == torch.float64 else 4
    return B * Hq * M * n_vis * item <= SAVED_PROBS_BUDGET


def head_grams(a: torch.Tensor, b: torch.Tensor, n_heads: int) -> torch.Tensor:
    """K_h = (a aᵀ) ⊙ (b_h b_hᵀ) for all heads: fp32 (n_heads, n, n) (fp64 from the reference
    when both inputs are fp64)."""
    if _choose((a, b)) == "triton":
        return _triton_module("triton_grams", a.is_cuda).head_grams(*_fp32(a, b), n_heads)
    return _reference.head_grams(a, b, n_heads)
