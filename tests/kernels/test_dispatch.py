"""Backend dispatch: TTT_LENS_KERNELS read at every call, labels, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import dispatch, reference

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("value,expected", [("torch", "torch"), ("triton", "triton"), (" Torch ", "torch"),
                                            ("auto", "triton" if HAS_CUDA else "torch"),
                                            ("", "triton" if HAS_CUDA else "torch")])
def test_current_backend(monkeypatch, value, expected):
    monkeypatch.setenv("TTT_LENS_KERNELS", value)
    assert kernels.current_backend() == expected


def test_current_backend_unset_is_auto(monkeypatch):
    monkeypatch.delenv("TTT_LENS_KERNELS", raising=False)
    assert kernels.current_backend() == ("triton" if HAS_CUDA else "torch")


@pytest.mark.parametrize("value,label", [
    ("torch", "PyTorch reference on GPU" if HAS_CUDA else "PyTorch reference on CPU"),
    ("triton", "Triton on GPU" if HAS_CUDA else "Triton (interpreter, CPU)"),
    ("auto", "Triton on GPU" if HAS_CUDA else "PyTorch reference on CPU"),
])
def test_backend_label(monkeypatch, value, label):
    monkeypatch.setenv("TTT_LENS_KERNELS", value)
    assert kernels.backend_label() == label


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("TTT_LENS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TTT_LENS_KERNELS"):
        kernels.current_backend()
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.attention_with_cache(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), 0)
    with pytest.raises(ValueError, match="TTT_LENS_KERNELS"):
        kernels.head_grams(torch.zeros(2, 3), torch.zeros(2, 4), 2)


def _spy(monkeypatch, module, name, calls, tag):
    orig = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(tag)
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_env_read_at_every_call(monkeypatch, device):
    from kernels import triton_attention, triton_grams

    calls: list[str] = []
    for mod, tag in ((reference, "torch"), (triton_attention, "triton")):
        _spy(monkeypatch, mod, "attention_with_cache", calls, f"fwd-{tag}")
        _spy(monkeypatch, mod, "attention_with_cache_dq", calls, f"dq-{tag}")
    _spy(monkeypatch, reference, "head_grams", calls, "gram-torch")
    _spy(monkeypatch, triton_grams, "head_grams", calls, "gram-triton")
    q = torch.randn(1, 2, 3, 16, device=device)
    k = torch.randn(1, 1, 5, 16, device=device)
    a, b = torch.randn(4, 3, device=device), torch.randn(4, 4, device=device)
    for value in ("torch", "triton", "torch", "auto"):
        monkeypatch.setenv("TTT_LENS_KERNELS", value)
        o, lse = kernels.attention_with_cache(q, k, k, 2)
        kernels.attention_with_cache_dq(q, k, k, o, lse, torch.ones_like(o), 2)
        kernels.head_grams(a, b, 2)
    auto = "triton" if HAS_CUDA else "torch"
    expected = []
    for tag in ("torch", "triton", "torch", auto):
        expected += [f"fwd-{tag}", f"dq-{tag}", f"gram-{tag}"]
    assert calls == expected


def test_auto_uses_reference_for_cpu_tensors(monkeypatch):
    """Even with the interpreter available, auto must not run Triton on CPU tensors."""
    from kernels import triton_attention

    monkeypatch.setenv("TTT_LENS_KERNELS", "auto")
    monkeypatch.setattr(triton_attention, "attention_with_cache",
                        lambda *a, **k: pytest.fail("auto ran Triton on CPU tensors"))
    q = torch.randn(1, 2, 3, 16)
    kernels.attention_with_cache(q, q[:, :1], q[:, :1], 0)


def test_frozen_kv_backward_dispatches_dq_only(monkeypatch, device):
    monkeypatch.setenv("TTT_LENS_KERNELS", "torch")
    monkeypatch.setattr(dispatch, "SAVED_PROBS_BUDGET", 0)     # force the recompute path
    calls: list[str] = []
    _spy(monkeypatch, reference, "attention_with_cache_dq", calls, "dq")
    q = torch.randn(1, 2, 4, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, 6, 16, device=device)
    kernels.frozen_kv_attention(q, k, k, 2).sum().backward()
    assert calls == ["dq"] and q.grad is not None and k.grad is None


@pytest.mark.parametrize("budget,expected", [(1 << 30, ["probs", "dq_from_probs"]), (0, ["fwd", "dq"])])
def test_keep_p_path_is_chosen_by_budget(monkeypatch, device, budget, expected):
    """The torch backend keeps P when it fits the budget (backward = two matmuls), else recomputes."""
    monkeypatch.setenv("TTT_LENS_KERNELS", "torch")
    monkeypatch.setattr(dispatch, "SAVED_PROBS_BUDGET", budget)
    calls: list[str] = []
    _spy(monkeypatch, reference, "attention_with_cache_probs", calls, "probs")
    _spy(monkeypatch, reference, "attention_dq_from_probs", calls, "dq_from_probs")
    _spy(monkeypatch, reference, "attention_with_cache", calls, "fwd")
    _spy(monkeypatch, reference, "attention_with_cache_dq", calls, "dq")
    q = torch.randn(1, 4, 5, 16, device=device, requires_grad=True)
    k = torch.randn(1, 2, 9, 16, device=device)
    kernels.frozen_kv_attention(q, k, k, 3).sum().backward()
    assert calls == expected and q.grad is not None


def test_saves_probs_counts_only_visible_keys(monkeypatch):
    monkeypatch.setenv("TTT_LENS_KERNELS", "torch")
    q, k = torch.zeros(1, 9, 128, 64), torch.zeros(1, 3, 4096, 64)
    monkeypatch.setattr(dispatch, "SAVED_PROBS_BUDGET", 9 * 128 * 228 * 4)
    assert dispatch.saves_probs(q, k, k, 100)          # sees 228 keys
    assert not dispatch.saves_probs(q, k, k, 101)      # sees 229 keys


_SCRIPT_NO_INTERPRETER = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, kernels
res = {"triton_imported_by_package": "triton" in sys.modules}
q = torch.randn(1, 2, 3, 16); k = torch.randn(1, 1, 5, 16)
os.environ["TTT_LENS_KERNELS"] = "triton"
try:
    kernels.attention_with_cache(q, k, k, 0); res["forced"] = "no error"
except RuntimeError as e:
    res["forced"] = str(e)
import kernels.triton_attention            # decorated for a GPU driver (no interpreter)
os.environ["TRITON_INTERPRET"] = "1"       # too late
try:
    kernels.attention_with_cache(q, k, k, 0); res["late"] = "no error"
except RuntimeError as e:
    res["late"] = str(e)
os.environ["TTT_LENS_KERNELS"] = "auto"
res["auto_ok"] = kernels.attention_with_cache(q, k, k, 0)[0].shape == q.shape
print(json.dumps(res))
"""

_SCRIPT_NO_TRITON = r"""
import json, os, sys
sys.modules["triton"] = None               # simulate a machine without triton
import torch, kernels
res = {"auto": kernels.current_backend()}
q = torch.randn(1, 2, 3, 16); k = torch.randn(1, 1, 5, 16)
res["auto_ok"] = kernels.attention_with_cache(q, k, k, 0)[0].shape == q.shape
os.environ["TTT_LENS_KERNELS"] = "triton"
try:
    kernels.head_grams(torch.randn(3, 2), torch.randn(3, 4), 2); res["forced"] = "no error"
except RuntimeError as e:
    res["forced"] = str(e)
print(json.dumps(res))
"""


def _run(script: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TTT_LENS_KERNELS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    res = _run(_SCRIPT_NO_INTERPRETER)
    assert res["triton_imported_by_package"] is False
    assert "TRITON_INTERPRET=1" in res["forced"] and "before" in res["forced"]
    assert "imported without" in res["late"] and "TRITON_INTERPRET=1" in res["late"]
    assert res["auto_ok"] is True


def test_without_triton_auto_falls_back_and_forced_errors():
    res = _run(_SCRIPT_NO_TRITON)
    assert res["auto"] == "torch" and res["auto_ok"] is True
    assert "triton cannot be imported" in res["forced"] and "TTT_LENS_KERNELS=torch" in res["forced"]
