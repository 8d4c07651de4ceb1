"""Reading st.download_button payloads back out of AppTest.

AppTest stores a download button's bytes in the MediaFileManager of a mock runtime it builds for
every run, and puts the file's URL in the button's proto. The `media` fixture records that manager,
so `payload(at, key)` returns the file of the last run (content, mimetype, the file name the
browser would save it under) — the same bytes a user downloads."""

from __future__ import annotations

import os

import pytest
import streamlit.testing.v1.app_test as app_test_module
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest


class RecordingMediaFileManager(MediaFileManager):
    last: "RecordingMediaFileManager | None" = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        type(self).last = self


@pytest.fixture
def media(monkeypatch: pytest.MonkeyPatch) -> type[RecordingMediaFileManager]:
    monkeypatch.setattr(app_test_module, "MediaFileManager", RecordingMediaFileManager)
    return RecordingMediaFileManager


def download_keys(at: AppTest) -> list[str]:
    """User keys of every download button of the last run."""
    return [b.proto.id.split("-", 2)[-1] if b.proto.id.startswith("$$ID-") else b.proto.id
            for b in at.get("download_button")]


def payload(at: AppTest, key: str):  # -> MemoryFile(content, mimetype, kind, filename)
    """The stored file of the download button with user key `key` (last run)."""
    for b in at.get("download_button"):
        if b.proto.id.endswith(f"-{key}") or b.proto.id == key:
            assert b.proto.url, f"download {key} has no URL (deferred or disabled)"
            mgr = RecordingMediaFileManager.last
            assert mgr is not None, "use the `media` fixture"
            f = mgr.read_file(os.path.basename(b.proto.url))
            assert f is not None, f"no stored file behind {b.proto.url}"
            return f
    raise AssertionError(f"no download button {key!r}: {download_keys(at)}")
