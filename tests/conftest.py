"""Shared pytest setup: repo root on sys.path, offline Hugging Face, deterministic torch threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting


def _keep_streamlit_navigation_v2() -> None:
    """AppTest resets `PagesManager.uses_pages_directory` before every run, so with a folder named
    `pages/` next to app.py (DESIGN §1 fixes that name) every rerun after the first takes
    Streamlit's legacy pages-directory path, which runs the page without app.py and drops the
    shared sidebar. TTT Lens always uses st.navigation, so pin the legacy flag off in tests.
    (The real server sets it off for good the first time st.navigation runs.)"""
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    if not getattr(PagesManager.__init__, "_ttt_lens_patched", False):
        init._ttt_lens_patched = True  # type: ignore[attr-defined]
        PagesManager.__init__ = init  # type: ignore[method-assign]


_keep_streamlit_navigation_v2()


import pytest  # noqa: E402


@pytest.fixture
def head_path_modes(monkeypatch):
    """A list that records, for every `HeadPath` the kernel routes build, whether it took the fused
    head path (`ttt_core.fused_head`): clear it, run, and read which mode the code ran in."""
    import ttt_core.kernel_routes as KR

    seen: list[bool] = []
    real = KR.HeadPath

    def spy(model, fused=None):
        hp = real(model, fused)
        seen.append(hp.fused)
        return hp

    monkeypatch.setattr(KR, "HeadPath", spy)
    return seen
