"""Which live engine runs a mode: "qttt" (`ttt_core.qttt`) or "paper" (`ttt_core.paper_gd`)."""

from __future__ import annotations

from ttt_core.models import LoadedModel
from ttt_core.paper_gd import PaperConfig, PaperRun
from ttt_core.prompts import Prompt
from ttt_core.qttt import QTTTConfig, QTTTRun
from ttt_core.types import StopLike

MODES = ("qttt", "paper")


def make_run(lm: LoadedModel, prompt: Prompt | str, mode: str = "qttt", config: QTTTConfig | PaperConfig | None = None,
             stop: StopLike = None) -> QTTTRun | PaperRun:
    """A run of `mode` ("qttt" | "paper")."""
    if mode == "qttt":
        return QTTTRun(lm, prompt, config, stop)  # type: ignore[arg-type]
    if mode == "paper":
        return PaperRun(lm, prompt, config, stop)  # type: ignore[arg-type]
    raise ValueError(f"unknown mode {mode!r}: use 'qttt' or 'paper'")


